"""Hand-written code and data shared by the async and sync backends (never generated).

``redis/`` holds the Lua scripts, ``postgres/`` the schema, ``sqlite/`` the blocking
transaction, topic and wake-up code with its schema. Each script and schema begins with a
comment stating its contract.
"""
