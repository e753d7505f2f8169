"""pmg_jax: Progressive Multi-Granularity training (PMG, ECCV 2020) in JAX/Flax, with Grad-CAM."""
