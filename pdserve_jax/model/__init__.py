"""Llama-family model: config, parameters, forward pass, checkpoint I/O."""
