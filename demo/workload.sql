-- pgbench script: the live workload of the demo. Each transaction is one thing a
-- MemberPulse tenant does: a member joins, pays, registers for an event, or Symfony
-- notifies someone.
\set org random(1, 4)
\set what random(1, 10)
\set n random(1, 1000000000)
BEGIN;
INSERT INTO member (organisation_id, email, full_name)
    SELECT :org, 'new' || :n || '@example.org', 'New member ' || :n WHERE :what <= 2;
INSERT INTO payment (organisation_id, member_id, amount)
    SELECT organisation_id, id, 10 + (:n % 90) FROM member
    WHERE organisation_id = :org AND :what BETWEEN 3 AND 6 ORDER BY random() LIMIT 1;
INSERT INTO registration (organisation_id, event_id, member_id)
    SELECT :org, (SELECT id FROM event WHERE organisation_id = :org ORDER BY random() LIMIT 1), id
    FROM member WHERE organisation_id = :org AND :what BETWEEN 7 AND 8 ORDER BY random() LIMIT 1;
INSERT INTO app_notification (organisation_id, member_id, title, body)
    SELECT :org, id, 'Payment received', 'Thank you!' FROM member
    WHERE organisation_id = :org AND :what >= 9 ORDER BY random() LIMIT 1;
COMMIT;
