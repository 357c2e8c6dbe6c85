"""``selfforcing serve``: a local web page that streams a causal student live over a WebSocket."""
