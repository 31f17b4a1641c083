"""Training the student: partial masking of trajectories into labels (`masking`, shown by
`maskview`), model loading (`modeling`), and fine-tuning one variant (`sft`), launched in
one process or several (`launch`)."""
