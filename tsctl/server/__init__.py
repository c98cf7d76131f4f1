"""The tsctl daemon (built in later issues)."""
