"""Source readers. Each yields :class:`Record` (and, for PubMed, :class:`Deletion`) objects.

Readers are plain generators over one file so they can be tested and reused on their own;
``corpus.steps`` wraps them as datatrove pipeline steps.
"""
