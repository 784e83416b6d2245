"""Publishing: the Hub client side (publish, fetch) and a Hub-compatible local server."""
