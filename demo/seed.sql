-- Sample data for four tenants.
INSERT INTO organisation (slug, name, timezone) VALUES
    ('rowing-lyon', 'Aviron Lyon', 'Europe/Paris'),
    ('chess-leeds', 'Leeds Chess Club', 'Europe/London'),
    ('choir-berlin', 'Chor Berlin-Mitte', 'Europe/Berlin'),
    ('hiking-denver', 'Denver Hiking Association', 'America/Denver');

INSERT INTO member (organisation_id, email, full_name, roles, status, joined_at)
SELECT o.id,
       format('member%s@%s.example.org', g, o.slug),
       format('Member %s of %s', g, o.name),
       CASE WHEN g = 1 THEN '["ROLE_ADMIN"]'::jsonb WHEN g <= 3 THEN '["ROLE_STAFF"]'::jsonb ELSE '["ROLE_MEMBER"]'::jsonb END,
       CASE WHEN g % 10 = 0 THEN 'lapsed' ELSE 'active' END,
       now() - (g || ' days')::interval
FROM organisation o, generate_series(1, 60) g;

INSERT INTO event (organisation_id, title, starts_at, capacity)
SELECT o.id, format('%s session %s', o.name, g), now() + (g || ' days')::interval, 20 + g
FROM organisation o, generate_series(1, 8) g;

INSERT INTO registration (organisation_id, event_id, member_id)
SELECT e.organisation_id, e.id, m.id
FROM event e JOIN member m ON m.organisation_id = e.organisation_id
WHERE (m.id + e.id) % 5 = 0;

INSERT INTO payment (organisation_id, member_id, amount, paid_at)
SELECT m.organisation_id, m.id, 25 + (m.id % 4) * 10, now() - ((m.id % 40) || ' days')::interval
FROM member m;
