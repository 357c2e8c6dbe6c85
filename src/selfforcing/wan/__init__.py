"""Real Wan2.1 models: the DiT in every checkpoint layout, the umT5 text encoder, the Wan VAE, and
the pipeline that streams them. diffusers / transformers come with the ``[wan]`` extra."""
