CREATE MATERIALIZED VIEW hourly_sales_by_sku AS
SELECT date_bin(INTERVAL '1 hour', event_time) AS hour, sku,
       SUM(quantity) AS units, AVG(unit_price) AS avg_price,
       MIN(unit_price) AS min_price, MAX(unit_price) AS max_price,
       COUNT(DISTINCT customer_id) AS customers
FROM orders WHERE status = 'paid' GROUP BY 1, 2
HAVING date_bin(INTERVAL '1 hour', event_time) >= now() - INTERVAL '35 days';
