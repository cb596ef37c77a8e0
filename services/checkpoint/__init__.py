"""agentbus service package."""
