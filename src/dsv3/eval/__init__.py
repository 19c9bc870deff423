"""Evaluations: how much of its context a model uses (``longctx``: loss by position, passkey, needle in
a haystack), with their pictures (``plots``) and the ``dsv3 eval`` command (``cli``)."""
