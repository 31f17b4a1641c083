"""The ReAct agent: prompts, output parsing."""
