// Validates custom resources against the published models of their CRDs (types, enums,
// required fields; the models do not refuse unknown fields). Input: a JSON file holding
// an array of objects. Run from a directory whose node_modules has package.json's
// dependencies (scripts/check-deploy copies it there).
import { readFileSync } from "node:fs";
import { Certificate } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate";
import { ClusterIssuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1/ClusterIssuer";
import { Issuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Issuer";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const models = {
  "cert-manager.io/v1/Certificate": Certificate,
  "cert-manager.io/v1/ClusterIssuer": ClusterIssuer,
  "cert-manager.io/v1/Issuer": Issuer,
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};

let failed = 0;
for (const object of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  const id = `${object.apiVersion}/${object.kind}`;
  const name = `${object.kind.toLowerCase()}/${object.metadata?.name}`;
  const Model = models[id];
  if (!Model) {
    console.log(`ERROR ${name}: no model for ${id}`);
    failed++;
    continue;
  }
  try {
    new Model(object).validate();
  } catch (error) {
    console.log(`ERROR ${name}: ${error.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
