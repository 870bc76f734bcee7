CREATE MATERIALIZED VIEW revenue_per_minute AS
SELECT date_bin(INTERVAL '1 minute', event_time) AS minute, warehouse_id,
       SUM(quantity * unit_price) AS revenue, COUNT(*) AS paid_lines,
       COUNT(DISTINCT order_id) AS orders
FROM orders WHERE status = 'paid' GROUP BY 1, 2
HAVING date_bin(INTERVAL '1 minute', event_time) >= now() - INTERVAL '2 days';
