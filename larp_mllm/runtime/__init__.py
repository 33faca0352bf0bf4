"""Runtime helpers shared by both stages: atomic file writes, cross-process locks, safe file names (files);
spawned worker processes (processes); YAML + flags -> argument dataclasses (config); the single-process
distributed environment (distributed); DeepSpeed JSONs with one meaning per "auto" key (deepspeed); Hub ids -> snapshot folders and uploads (hub);
checkpoint folders retired out of their namespace and the kill-test hook (checkpoint_folders)."""
