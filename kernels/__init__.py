"""Triton gather/scatter kernels between KV pools and staging buffers (import name: kvd_kernels)."""
