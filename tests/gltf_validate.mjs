// Validate GLB files with the Khronos glTF Validator; prints {path: issues} as JSON.
// usage: node gltf_validate.mjs <node_modules folder> <file.glb>...
import fs from 'fs';
import path from 'path';
import { createRequire } from 'module';

const [modules, ...files] = process.argv.slice(2);
const require = createRequire(path.join(path.resolve(modules), 'noop.js'));
const validator = require('gltf-validator');

const out = {};
for (const f of files) {
  try {
    const report = await validator.validateBytes(new Uint8Array(fs.readFileSync(f)), {
      maxIssues: 100,
      // a GLB carries its buffers; anything external is an error worth seeing
      externalResourceFunction: (uri) => Promise.reject(new Error(`external resource ${uri}`)),
    });
    out[f] = report.issues;
  } catch (e) {  // not glTF at all
    out[f] = { numErrors: 1, numWarnings: 0, numInfos: 0, numHints: 0, truncated: false,
               messages: [{ code: 'UNREADABLE', message: String(e), severity: 0, pointer: '' }] };
  }
}
process.stdout.write(JSON.stringify(out));
