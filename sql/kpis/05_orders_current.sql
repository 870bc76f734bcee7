CREATE MATERIALIZED VIEW orders_current AS
SELECT * FROM (
  SELECT DISTINCT ON (order_id, sku) order_id, sku, customer_id, warehouse_id,
         status, quantity, unit_price, event_time
  FROM orders ORDER BY order_id, sku, event_time DESC
) lines
WHERE status NOT IN ('delivered', 'cancelled', 'returned')
   OR event_time >= now() - INTERVAL '7 days';
