"""The application's backend over HTTP: connect and publish proxies, signed webhooks."""
