// Regenerates tests/fixtures/stripe-requests.json: for every Stripe operation billsync sends
// (and those an open issue adds), its method, path and parameters — names, which are required,
// types, enum values, which accept '' (Stripe's "unset") — as the official `stripe` npm
// package declares them for the API version billsync pins.
//
//   npm ci --prefix scripts/stripe-conformance
//   node scripts/stripe-conformance/generate.mjs          # rewrite the snapshot
//   node scripts/stripe-conformance/generate.mjs --check  # fail if the snapshot differs
//
// Methods and paths come from the package's resource definitions (cjs/resources/*.js),
// parameters from its type definitions (types/*.d.ts), read with the TypeScript compiler.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const here = path.dirname(fileURLToPath(import.meta.url));
const stripeDir = path.join(here, 'node_modules', 'stripe');
const snapshotPath = path.join(here, '..', '..', 'tests', 'fixtures', 'stripe-requests.json');
const PINNED = '2025-08-27.basil';

// billsync's operation name → [resource file, its method, the parameters' type].
const OPERATIONS = {
  'customers.create': ['Customers', 'create', 'CustomerCreateParams'],
  'customers.retrieve': ['Customers', 'retrieve', 'CustomerRetrieveParams'],
  'customers.update': ['Customers', 'update', 'CustomerUpdateParams'],
  'customers.delete': ['Customers', 'del', 'CustomerDeleteParams'],
  'customers.list': ['Customers', 'list', 'CustomerListParams'],
  'customers.search': ['Customers', 'search', 'CustomerSearchParams'],
  'customers.payment_methods.list': [
    'Customers',
    'listPaymentMethods',
    'CustomerListPaymentMethodsParams',
  ],
  'subscriptions.list': ['Subscriptions', 'list', 'SubscriptionListParams'],
  'subscriptions.retrieve': ['Subscriptions', 'retrieve', 'SubscriptionRetrieveParams'],
  'subscriptions.cancel': ['Subscriptions', 'cancel', 'SubscriptionCancelParams'],
  'invoices.list': ['Invoices', 'list', 'InvoiceListParams'],
  'billing_portal.sessions.create': [
    'BillingPortal/Sessions',
    'create',
    'BillingPortal.SessionCreateParams',
  ],
  'billing_portal.configurations.create': [
    'BillingPortal/Configurations',
    'create',
    'BillingPortal.ConfigurationCreateParams',
  ],
  'billing_portal.configurations.retrieve': [
    'BillingPortal/Configurations',
    'retrieve',
    'BillingPortal.ConfigurationRetrieveParams',
  ],
  'billing_portal.configurations.update': [
    'BillingPortal/Configurations',
    'update',
    'BillingPortal.ConfigurationUpdateParams',
  ],
  'billing_portal.configurations.list': [
    'BillingPortal/Configurations',
    'list',
    'BillingPortal.ConfigurationListParams',
  ],
  'prices.retrieve': ['Prices', 'retrieve', 'PriceRetrieveParams'],
  'prices.list': ['Prices', 'list', 'PriceListParams'],
  'webhook_endpoints.create': ['WebhookEndpoints', 'create', 'WebhookEndpointCreateParams'],
  'webhook_endpoints.update': ['WebhookEndpoints', 'update', 'WebhookEndpointUpdateParams'],
  'webhook_endpoints.list': ['WebhookEndpoints', 'list', 'WebhookEndpointListParams'],
  'webhook_endpoints.delete': ['WebhookEndpoints', 'del', 'WebhookEndpointDeleteParams'],
};

function routes(resource) {
  const source = fs.readFileSync(path.join(stripeDir, 'cjs', 'resources', `${resource}.js`), 'utf8');
  const found = {};
  const pattern = /(\w+): stripeMethod\(\{\s*method: '(\w+)',\s*fullPath: '([^']+)'/g;
  for (const [, name, method, fullPath] of source.matchAll(pattern)) {
    found[name] = { method, path: fullPath };
  }
  return found;
}

// One program over the package's declarations, plus a file naming each parameters type.
const probeName = path.join(stripeDir, '__billsync_probe__.ts');
const names = Object.values(OPERATIONS).map(([, , type]) => type);
const probeText =
  "import Stripe from 'stripe';\n" +
  names.map((type, i) => `export type T${i} = Stripe.${type};\n`).join('');
const options = {
  strict: true,
  noEmit: true,
  target: ts.ScriptTarget.ES2022,
  module: ts.ModuleKind.NodeNext,
  moduleResolution: ts.ModuleResolutionKind.NodeNext,
  types: [],
};
const host = ts.createCompilerHost(options);
const readFile = host.readFile.bind(host);
const fileExists = host.fileExists.bind(host);
const getSourceFile = host.getSourceFile.bind(host);
host.readFile = (f) => (f === probeName ? probeText : readFile(f));
host.fileExists = (f) => f === probeName || fileExists(f);
host.getSourceFile = (f, v, onError, create) =>
  f === probeName
    ? ts.createSourceFile(f, probeText, v, true)
    : getSourceFile(f, v, onError, create);
const program = ts.createProgram([probeName], options, host);
const checker = program.getTypeChecker();
const probe = program.getSourceFile(probeName);
const aliases = probe.statements.filter(ts.isTypeAliasDeclaration);

const F = ts.TypeFlags;

// A schema node: {"type": "string" | "number" | "boolean"}, {"enum": [...]},
// {"type": "array", "items"}, {"type": "object", "properties": {name: node}, "required": [...]},
// {"type": "map", "values"}, {"any_of": [...]}; "emptyable": true where '' is accepted,
// "nullable": true where null is.
function schema(type, trail) {
  if (trail.length > 16) throw new Error(`too deep: ${trail.join('.')}`);
  if (type.isUnion()) {
    let emptyable = false;
    let nullable = false;
    const literals = [];
    let booleans = 0;
    const rest = [];
    for (const part of type.types) {
      if (part.flags & (F.Undefined | F.Void)) continue;
      if (part.flags & F.Null) nullable = true;
      else if (part.isStringLiteral() && part.value === '') emptyable = true;
      else if (part.isStringLiteral()) literals.push(part.value);
      else if (part.flags & F.BooleanLiteral) booleans += 1;
      else rest.push(part);
    }
    const alternatives = rest.map((part) => schema(part, trail));
    if (literals.length) alternatives.push({ enum: literals.sort() });
    if (booleans) alternatives.push({ type: 'boolean' });
    let node;
    if (alternatives.length === 1) node = alternatives[0];
    else if (alternatives.length === 0) node = { enum: [] };
    else node = { any_of: alternatives };
    if (emptyable) node = { ...node, emptyable: true };
    if (nullable) node = { ...node, nullable: true };
    return node;
  }
  if (type.flags & F.String) return { type: 'string' };
  if (type.isStringLiteral()) return { enum: [type.value] };
  if (type.flags & (F.Number | F.NumberLiteral)) return { type: 'number' };
  if (type.flags & (F.Boolean | F.BooleanLiteral)) return { type: 'boolean' };
  if (checker.isArrayType(type)) {
    const [item] = checker.getTypeArguments(type);
    return { type: 'array', items: schema(item, [...trail, '[]']) };
  }
  if (type.flags & F.Object) {
    const index = checker.getIndexInfoOfType(type, ts.IndexKind.String);
    const properties = checker.getPropertiesOfType(type);
    if (index && properties.length === 0) {
      return { type: 'map', values: schema(index.type, [...trail, '*']) };
    }
    const node = { type: 'object', properties: {}, required: [] };
    for (const property of properties.sort((a, b) => a.name.localeCompare(b.name))) {
      const declaration = property.valueDeclaration ?? property.declarations[0];
      const propertyType = checker.getTypeOfSymbolAtLocation(property, declaration);
      node.properties[property.name] = schema(propertyType, [...trail, property.name]);
      if (!(property.flags & ts.SymbolFlags.Optional)) node.required.push(property.name);
    }
    if (index) node.additional = schema(index.type, [...trail, '*']);
    return node;
  }
  throw new Error(`unsupported type at ${trail.join('.')}: ${checker.typeToString(type)}`);
}

const diagnostics = ts.getPreEmitDiagnostics(program, probe);
if (diagnostics.length) {
  throw new Error(ts.formatDiagnosticsWithColorAndNewLine(diagnostics, host));
}

const latest = fs.readFileSync(path.join(stripeDir, 'types', 'lib.d.ts'), 'utf8');
const version = /LatestApiVersion = '([^']+)'/.exec(latest)?.[1];
if (version !== PINNED) throw new Error(`stripe package speaks ${version}, billsync pins ${PINNED}`);
const pkg = JSON.parse(fs.readFileSync(path.join(stripeDir, 'package.json'), 'utf8'));
const openapi = fs.readFileSync(path.join(stripeDir, 'OPENAPI_VERSION'), 'utf8').trim();

const operations = {};
Object.entries(OPERATIONS).forEach(([operation, [resource, method, type]], i) => {
  const route = routes(resource)[method];
  if (!route) throw new Error(`${resource}.js has no method ${method}`);
  const alias = aliases.find((a) => a.name.text === `T${i}`);
  const params = schema(checker.getTypeAtLocation(alias), [type]);
  operations[operation] = { method: route.method, path: route.path, params_type: type, params };
});

const snapshot = {
  comment:
    'Generated by scripts/stripe-conformance/generate.mjs from the stripe npm package; do not edit.',
  source: `stripe@${pkg.version} (OpenAPI ${openapi})`,
  api_version: version,
  operations,
};
const text = `${JSON.stringify(snapshot, null, 1)}\n`;
if (process.argv.includes('--check')) {
  const committed = fs.existsSync(snapshotPath) ? fs.readFileSync(snapshotPath, 'utf8') : '';
  if (committed !== text) {
    console.error(`${path.relative(process.cwd(), snapshotPath)} differs from what stripe@${pkg.version} declares; run generate.mjs`);
    process.exit(1);
  }
  console.log(`stripe-requests.json matches stripe@${pkg.version} (${Object.keys(operations).length} operations)`);
} else {
  fs.writeFileSync(snapshotPath, text);
  console.log(`wrote ${snapshotPath} (${Object.keys(operations).length} operations, ${text.length} bytes)`);
}
