"""Training the student (init_sft, golden, step, step_nomask): partial masking of a
trajectory into labels (`masking`, shown by `maskview`), training examples fitted to
`max_seq_len` (`examples`), model loading and preparation (`modeling`), fine-tuning one
variant (`sft`) with its metering, run keys and resume (`runs`) and model card (`card`),
launched in one process or several (`launch`, `distributed`)."""
