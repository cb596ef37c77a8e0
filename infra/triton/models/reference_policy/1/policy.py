"""Decision logic of the reference policy (pure Python, no Triton imports).

The full agent behaviour (tool selection from the prompt's tool specs) arrives with
the agent-loop issue; here the policy answers deterministically from the prompt so
the model loads, serves and can be tested end to end.
"""

import hashlib


def decide(prompt, params=None):
    """Return the completion for ``prompt``: same prompt, same answer, whatever the parameters."""
    last_user = ""
    for line in prompt.splitlines():
        if line.startswith("user:"):
            last_user = line[len("user:") :].strip()
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]
    subject = last_user or prompt.strip()[:200]
    return f"reference_policy heard: {subject} [{digest}]"
