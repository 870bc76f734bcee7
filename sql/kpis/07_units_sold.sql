CREATE MATERIALIZED VIEW units_sold AS
SELECT sku, warehouse_id, SUM(quantity) AS units_sold
FROM orders WHERE status = 'paid' GROUP BY sku, warehouse_id;
