"""SQLite code shared by the async and sync stores (hand-written, blocking).

Transactions (``tx``), topics (``topics``), wake-up sockets (``wake``) and the schema.
"""
