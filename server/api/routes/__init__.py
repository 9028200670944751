"""The HTTP routes, one module per concern; each route function only parses, delegates and answers."""
