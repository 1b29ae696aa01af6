"""Secure aggregation (SecAgg+) on the service's side: the coordinator's stages, the workers' sums.

``coordinator`` drives each secure round's key exchange and unmasking over
the bus; ``state`` is that protocol as a pure state machine; ``graph`` draws
the neighbourhoods; ``strategy`` is what workers fold (masked sums modulo
2^32) and how the combiner unmasks the sum. The primitives both sides share
are in ``broker.secagg``.
"""
