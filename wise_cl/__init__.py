"""wise-cl: lifelong model editing with WISE on PyTorch Lightning."""
