"""geotrain common code: configuration, the GPT model, token data, codecs, the reference trainer."""

__version__ = "0.1.0"
