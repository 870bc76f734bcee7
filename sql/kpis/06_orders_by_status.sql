CREATE MATERIALIZED VIEW orders_by_status AS
SELECT status, COUNT(*) AS lines, SUM(quantity * unit_price) AS value,
       MAX(quantity * unit_price) AS largest_line
FROM orders_current GROUP BY status;
