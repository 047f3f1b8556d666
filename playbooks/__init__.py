"""The playbook engine and its actions."""
