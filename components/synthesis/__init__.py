"""Synthetic defects: masks and placement, generators (procedural, cut-paste, diffusion, own DDPM), labels, filters."""
