"""The diffusion layer: the Gaussian process as pure functions (``process``) and nested sampling through a chain of levels (``chain``)."""
