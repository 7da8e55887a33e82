// The types tests/tests/assets_grafana_schema.rs holds every dashboard to. It inlines each
// dashboard's JSON as an object literal twice, once `satisfies GrafanaDashboard` and once
// `satisfies ConnscopeDashboard`, so TypeScript's excess-property check applies at every
// level: an unknown field or a wrong type anywhere in a typed part is an error.
//
// What is typed (all from @grafana/schema, pinned in package.json):
// - GrafanaDashboard: Grafana's own `Dashboard`: top-level fields, time, templating
//   variables, annotations, links, panels' common fields (gridPos, datasource, fieldConfig
//   defaults such as unit, min, decimals, thresholds, color; overrides' matcher),
//   transformations' ids. Grafana types a panel's `options`, `targets` and
//   `fieldConfig.defaults.custom` as open records there, so they are not checked by it.
// - ConnscopeDashboard adds, per panel type, the panel plugin's own `Options` and
//   `FieldConfig` types (timeseries, stat, table, heatmap) and types every target as a
//   Prometheus query. A panel of another type is an error: add its plugin types here.
// Not typed by either: transformations' options and override property values (`unknown` in
// Grafana's schema), the meaning of strings (units, PromQL, colours), and anything Grafana
// only checks at run time (for example that a refId is unique).

import type {
  DataQuery,
  Dashboard,
  FieldConfig,
  FieldConfigSource,
  Panel,
  RowPanel,
} from '@grafana/schema';
import type * as heatmap from '@grafana/schema/dist/esm/raw/composable/heatmap/panelcfg/x/HeatmapPanelCfg_types.gen';
import type * as stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as timeseries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

/**
 * `T` as JSON spells it. @grafana/schema declares string enums (FieldColorModeId,
 * ThresholdsMode, GraphDrawStyle, ...), which TypeScript only accepts as enum members; JSON
 * holds their string values. This maps each string enum to the union of its values and
 * leaves everything else, optionality included, as it is.
 */
export type AsJson<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer Item>
      ? Array<AsJson<Item>>
      : T extends object
        ? { [K in keyof T]: AsJson<T[K]> }
        : T;

/** Grafana's own dashboard type, nothing added. */
export type GrafanaDashboard = AsJson<Dashboard>;

/**
 * A target of the Prometheus data source: @grafana/schema's `DataQuery` with the fields of
 * Grafana's PrometheusDataQuery kind, which @grafana/schema does not publish (it ships with
 * the Prometheus data source plugin).
 */
export interface PrometheusQuery extends DataQuery {
  expr: string;
  editorMode?: 'code' | 'builder';
  exemplar?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  instant?: boolean;
  interval?: string;
  intervalFactor?: number;
  legendFormat?: string;
  range?: boolean;
}

/** A panel whose options and custom field config are its plugin's own types. */
type PluginPanel<Kind extends string, Options, Custom> = Omit<
  Panel,
  'type' | 'options' | 'fieldConfig' | 'targets'
> & {
  type: Kind;
  options: Options;
  fieldConfig: Omit<FieldConfigSource, 'defaults'> & {
    defaults: Omit<FieldConfig, 'custom'> & { custom?: Custom };
  };
  targets: PrometheusQuery[];
};

/** The panel types the dashboards use; stat panels have no custom field config. */
type TypedPanel =
  | PluginPanel<'timeseries', timeseries.Options, timeseries.FieldConfig>
  | PluginPanel<'stat', stat.Options, never>
  | PluginPanel<'table', table.Options, table.FieldConfig>
  | PluginPanel<'heatmap', heatmap.Options, heatmap.FieldConfig>;

type TypedRow = Omit<RowPanel, 'type' | 'panels'> & { type: 'row'; panels: TypedPanel[] };

/** Grafana's dashboard type with every panel typed by its plugin. */
export type ConnscopeDashboard = AsJson<
  Omit<Dashboard, 'panels'> & { panels: Array<TypedRow | TypedPanel> }
>;
