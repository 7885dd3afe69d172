"""bayeskd: distill open language models from closed-source ones by estimating the teacher's token distributions."""

__version__ = "0.1.0"
