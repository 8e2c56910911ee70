"""Triton kernels for CLIP training (contrastive loss, flash attention); imports only torch and triton."""
