"""Attack suite (issue 9): a raw-socket client and real servers; imports nothing from etfs."""
