-- outboxhook schema, version 4 (SQLite): the outbox lease.

-- On SQLite one dispatcher at a time expands new events: the one holding this
-- lease (owner, until: unix milliseconds). It starts their deliveries straight
-- from the outbox and writes each event expanded, with all its deliveries and
-- their first attempts, once those attempts are over. An event it holds stays
-- unexpanded meanwhile, so if it dies, the dispatcher that takes the lease
-- over once it lapses expands the event again and nothing is lost.
CREATE TABLE webhook_outbox_lease (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    owner TEXT    NOT NULL DEFAULT '',
    until INTEGER NOT NULL DEFAULT 0
);
INSERT INTO webhook_outbox_lease (id) VALUES (1);
