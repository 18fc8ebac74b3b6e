"""Protocol bridging: queries and retrieves answered by an upstream PACS or DICOMweb service."""
