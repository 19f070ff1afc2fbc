"""Memory the daemon opens: engine pools (shm / CUDA IPC), pool records, the staging pool and kernels."""
