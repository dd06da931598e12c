"""The client side: ChatClient and the terminal chat."""
