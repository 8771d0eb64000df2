"""The harness's bottom layer: errors, the state folder, bounded reading of user files, masking, git and
child processes.  Nothing here imports from the layers above it."""
