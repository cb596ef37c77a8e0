"""agentctl: the operator's and client's command line for agentbus (send, history, sessions, tail)."""
