"""LoRA on a streamed frozen base: adapters, their run directory, the step and the job."""
