"""dptrain."""
