"""The peers agentbus is benchmarked against: LangGraph + Postgres checkpointer, and Restate.

Each peer runs the bench's workload (:mod:`tests.bench.peers.common`) and returns a
:class:`~tests.bench.peers.common.PeerResult`; ``python -m tests.bench.peers`` runs one
in its own process and prints the result as JSON. See README.md beside this file.
"""
