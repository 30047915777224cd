"""Evaluation stage: held-out perplexity, log-likelihood multiple choice and generative chain-of-thought
on declarative tasks (``tasks/*.yaml``), with lm-eval-compatible results.

Entry point: :func:`medfoundry.eval.run.evaluate` (``medfoundry eval`` on the command line).
"""
