-- A few catalogue rows so every environment serves data from its first deployment.
INSERT INTO items (name, price_cents) VALUES
('notebook', 450),
('pencil', 120),
('backpack', 3999),
('water bottle', 1575),
('desk lamp', 2850);
