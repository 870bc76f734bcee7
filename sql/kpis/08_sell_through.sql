CREATE MATERIALIZED VIEW sell_through AS
SELECT s.sku, s.warehouse_id, s.on_hand, COALESCE(u.units_sold, 0) AS units_sold
FROM stock_on_hand s LEFT JOIN units_sold u
  ON s.sku = u.sku AND s.warehouse_id = u.warehouse_id;
