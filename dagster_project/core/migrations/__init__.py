"""Migration tooling: checksum history and applying (`history`), sqlfluff lint (`lint`),
safety rules with squawk and waivers (`safety`), backward compatibility for the canary
(`compat`) and schema drift (`drift`). Modules are imported by name; heavy libraries load
only inside the functions that need them."""
