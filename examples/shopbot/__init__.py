"""ShopBot: a ReAct agent that handles returns on a real database, HTTP label service and SMTP server (see README.md)."""
