"""The OpenAI-compatible HTTP server (``medfoundry serve``) on the generation engine (:mod:`medfoundry.generation`)."""
