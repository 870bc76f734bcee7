CREATE MATERIALIZED VIEW stock_on_hand AS
SELECT sku, warehouse_id, SUM(quantity) AS on_hand,
       MAX(event_time) AS last_movement, COUNT(*) AS movements
FROM inventory GROUP BY sku, warehouse_id;
