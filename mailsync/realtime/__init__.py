"""Live events for the page: sync progress and message changes, as SignalR messages."""
